"""Per-model serializers, prepared once per model: what Django's XML and JSON serializers
write for one row, without their per-call machinery.

Django's serializers build a serializer object, a SAX generator and a ``StringIO`` per call,
sort and quote every attribute of every element again, and look each field's type up again:
that was ~110 us of a registered save's ~170 us overhead (docs/benchmarks.md, ingest). A
``RowFormat`` does the per-model part once (element heads with their quoted attributes, which
fields take which path) and per row only reads the values.

Exactness: every value goes through the code Django's serializers run for it
(``value_to_string``, ``value_from_object``, ``is_protected_type``, ``json.dumps`` with the
field's encoder, the same many-to-many query). Only two shortcuts replace a method call by
its body, and only where the field's class does not override that method: ``Field``'s own
``value_to_string`` (``str(getattr(obj, attname))``) and the ``isoformat()`` of ``DateField``,
``DateTimeField`` and ``TimeField``. tests/test_fast_serializer.py checks byte-identical output
against Django's serializers (hypothesis). Models with a composite primary key use Django's
serializers (``django_text``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import quoteattr

from django.core.serializers.json import DjangoJSONEncoder
from django.db import models
from django.db.models import Field, Model
from django.db.models.query_utils import DeferredAttribute
from django.utils.encoding import is_protected_type

XmlPart = Callable[[Model], str]
JsonPart = Callable[[Model], Any]
DjangoText = Callable[[Model, str], str]

_ISOFORMAT = {models.DateField.value_to_string, models.DateTimeField.value_to_string,
              models.TimeField.value_to_string}
# json.dump(..., cls=DjangoJSONEncoder, ensure_ascii=False) as Django's JSON serializer
# calls it; one encoder serves every call (encode() keeps no state between calls).
_JSON = DjangoJSONEncoder(ensure_ascii=False)
_XML_NONE = "<None></None>"
_COMPOSITE: Any = getattr(models, "CompositePrimaryKey", ())  # Django >= 5.2


def escape(text: str) -> str:
    """``xml.sax.saxutils.escape`` (what XMLGenerator.characters writes) without its dict."""
    return text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")


def characters(value: Any) -> str:
    """What ``XMLGenerator.characters(value)`` writes: nothing for a falsy value, bytes decoded."""
    if not value:
        return ""
    if not isinstance(value, str):
        value = str(value, "utf-8")
    return escape(value)


@dataclass(frozen=True, slots=True)
class RowFormat:
    """One model's prepared serializer (``xml`` and ``json`` give Django's text for a row)."""

    label: str
    object_head: str  # '<object model="app.model"' (the pk attribute follows per row)
    pk: Field[Any, Any]
    pk_plain: bool
    xml_parts: tuple[XmlPart, ...]
    json_parts: tuple[tuple[str, JsonPart], ...]
    cuttable: tuple[str, ...]  # attnames of text columns serialize() may cut

    def xml(self, obj: Model) -> str:
        """``<django-objects>`` with this row, as Django's XML serializer writes it (no
        XML declaration)."""
        if obj.pk is None:
            head = self.object_head + ">"
        elif self.pk_plain:
            pk = getattr(obj, self.pk.attname)
            if type(pk) is int:  # digits and a sign: quoteattr would change nothing
                head = f'{self.object_head} pk="{pk}">'
            else:
                head = f"{self.object_head} pk={quoteattr(pk if type(pk) is str else str(pk))}>"
        else:
            head = f"{self.object_head} pk={quoteattr(self.pk.value_to_string(obj))}>"
        body = "".join([part(obj) for part in self.xml_parts])
        return f'<django-objects version="1.0">{head}{body}</object></django-objects>'

    def json(self, obj: Model) -> str:
        """The one-element list Django's JSON serializer writes for this row."""
        fields = {name: part(obj) for name, part in self.json_parts}
        dump = {"model": self.label, "pk": _python_value(obj, self.pk), "fields": fields}
        return f"[{_JSON.encode(dump)}]"


_formats: dict[type[Model], RowFormat | None] = {}


def row_format(model: type[Model]) -> RowFormat | None:
    """``model``'s prepared serializer (None: use Django's), built at its first use.

    Not at ``register()``: that runs while the model's module is imported, before related
    models are loaded, and a foreign key's target label is only known later.
    """
    try:
        return _formats[model]
    except KeyError:
        fmt = _formats[model] = _prepare(model)
        return fmt


def forget(model: type[Model] | None = None) -> None:
    """Drop prepared serializers (of ``model``, or all): the next use prepares again."""
    if model is None:
        _formats.clear()
    else:
        _formats.pop(model, None)


def _prepare(model: type[Model]) -> RowFormat | None:
    meta = model._meta
    concrete = meta.concrete_model._meta
    if meta.pk is None or isinstance(meta.pk, _COMPOSITE):
        return None
    fields = [f for f in concrete.local_fields if f.serialize]
    m2m = [f for f in concrete.local_many_to_many
           if f.serialize and f.remote_field.through._meta.auto_created]
    xml = [_xml_part(model, f) if f.remote_field is None else _xml_fk(f) for f in fields]
    json_parts = [(f.name, _json_part(model, f)) for f in fields]
    return RowFormat(
        label=str(meta),
        object_head=f"<object model={quoteattr(str(meta))}",
        pk=meta.pk,
        pk_plain=_plain(model, meta.pk),
        xml_parts=(*xml, *(_xml_m2m(f) for f in m2m)),
        json_parts=(*json_parts, *((f.name, _json_m2m(f)) for f in m2m)),
        cuttable=tuple(f.attname for f in meta.concrete_fields
                       if f.serialize and not f.is_relation and not f.primary_key
                       and f.get_internal_type() != "JSONField"),
    )


def _plain(model: type[Model], field: Field[Any, Any]) -> bool:
    """Whether Django's ``value_to_string`` for ``field`` is ``str(getattr(obj, attname))``
    and ``getattr(obj, field.name)`` reads the same attribute."""
    cls = type(field)
    return (cls.value_to_string is Field.value_to_string
            and cls.value_from_object is Field.value_from_object
            and field.name == field.attname and _stored(model, field))


def _stored(model: type[Model], field: Field[Any, Any]) -> bool:
    """Whether the attribute is Django's plain deferred attribute (no custom descriptor),
    looked up like ``getattr`` would (a proxy model inherits it)."""
    for klass in model.__mro__:
        if field.attname in klass.__dict__:
            return type(klass.__dict__[field.attname]) is DeferredAttribute
    return False


def _xml_part(model: type[Model], field: Field[Any, Any]) -> XmlPart:
    """``handle_field`` of Django's XML serializer for ``field``."""
    head = (f"<field name={quoteattr(field.name)} "
            f"type={quoteattr(field.get_internal_type())}>")
    none, attname = f"{head}{_XML_NONE}</field>", field.attname
    # characters() of a str, inlined (escape): these run for every field of every row.
    if _plain(model, field):
        def plain(obj: Model) -> str:
            value = getattr(obj, attname)
            if value is None:
                return none
            text = value if type(value) is str else str(value)
            text = text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")
            return f"{head}{text}</field>"
        return plain
    if type(field).value_to_string in _ISOFORMAT and _stored(model, field) \
            and type(field).value_from_object is Field.value_from_object:
        def isoformat(obj: Model) -> str:
            value = getattr(obj, attname)
            if value is None:
                return none
            text = value.isoformat()
            text = text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")
            return f"{head}{text}</field>"
        return isoformat
    return _xml_generic(field, head, none)


def _xml_generic(field: Field[Any, Any], head: str, none: str) -> XmlPart:
    """Django's own steps for a field type with no shortcut (JSON, binary, custom ...)."""
    name, is_json = field.name, field.get_internal_type() == "JSONField"
    encoder = getattr(field, "encoder", None)

    def generic(obj: Model) -> str:
        if getattr(obj, name) is None:
            return none
        value = field.value_to_string(obj)
        if is_json:
            value = json.dumps(value, cls=encoder)
        return f"{head}{characters(value)}</field>"
    return generic


def _relation_head(field: Any) -> str:
    return (f"<field name={quoteattr(field.name)} "
            f"rel={quoteattr(field.remote_field.__class__.__name__)} "
            f"to={quoteattr(str(field.remote_field.model._meta))}>")


def _xml_fk(field: Field[Any, Any]) -> XmlPart:
    """``handle_fk_field`` (no natural keys: scalepub never asks for them)."""
    head, attname = _relation_head(field), field.attname
    none = f"{head}{_XML_NONE}</field>"

    def fk(obj: Model) -> str:
        value = getattr(obj, attname)
        return none if value is None else f"{head}{characters(str(value))}</field>"
    return fk


def _related(obj: Model, field: Any) -> Any:
    """The related rows Django's serializers iterate: the prefetched ones or one query."""
    query_set = getattr(obj, field.name).select_related(None).only("pk")
    chunk_size = 2000 if query_set._prefetch_related_lookups else None
    return getattr(obj, "_prefetched_objects_cache", {}).get(
        field.name, query_set.iterator(chunk_size=chunk_size))


def _xml_m2m(field: Any) -> XmlPart:
    """``handle_m2m_field``: one ``<object pk=...>`` per related row."""
    head = _relation_head(field)

    def m2m(obj: Model) -> str:
        rows = "".join([f"<object pk={quoteattr(str(r.pk))}></object>"
                        for r in _related(obj, field)])
        return f"{head}{rows}</field>"
    return m2m


def _python_value(obj: Model, field: Field[Any, Any]) -> Any:
    """``_value_from_field`` of Django's Python serializer (which the JSON one extends)."""
    value = field.value_from_object(obj)
    return value if is_protected_type(value) else field.value_to_string(obj)


def _json_part(model: type[Model], field: Field[Any, Any]) -> JsonPart:
    """``handle_field``/``handle_fk_field`` of Django's JSON serializer for ``field``."""
    if _plain(model, field):
        attname = field.attname

        def plain(obj: Model) -> Any:
            value = getattr(obj, attname)
            if type(value) is str or is_protected_type(value):
                return value
            return str(value)
        return plain
    return lambda obj: _python_value(obj, field)


def _json_m2m(field: Any) -> JsonPart:
    def m2m(obj: Model) -> Any:
        return [_python_value(r, r._meta.pk) for r in _related(obj, field)]
    return m2m
