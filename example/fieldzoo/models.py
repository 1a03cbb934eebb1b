"""A field of each kind Django serializes differently: tests/test_fast_serializer.py proves the
fast serializer byte-identical to Django's on them, loadtest/bench_ingest.py saves ``Wide``."""

import uuid

from django.db import models

import scalepub


class Point:
    """The Python value of ``PointField``."""

    def __init__(self, x: int, y: int) -> None:
        self.x, self.y = x, y

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Point) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self) -> int:
        return hash((self.x, self.y))


class PointField(models.CharField):
    """A custom field: its own Python type and its own ``value_to_string``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("max_length", 50)
        super().__init__(*args, **kwargs)

    def from_db_value(self, value, expression, connection):
        return self.to_python(value)

    def to_python(self, value):
        if value is None or isinstance(value, Point):
            return value
        x, y = str(value).split(",")
        return Point(int(x), int(y))

    def get_prep_value(self, value):
        value = self.to_python(value)
        return None if value is None else f"{value.x},{value.y}"

    def value_to_string(self, obj):
        value = self.value_from_object(obj)
        return "" if value is None else f"({value.x}; {value.y})"


class Tag(models.Model):
    """The target of ``Wide.tag`` and ``Tagged.tags``."""

    name = models.CharField(max_length=50)

    def __str__(self) -> str:
        return self.name


@scalepub.register
class Wide(models.Model):
    """20 columns besides the id, one of each common type (the 20-field benchmark model)."""

    title = models.CharField(max_length=200)
    body = models.TextField(blank=True)
    slug = models.SlugField(blank=True)
    email = models.EmailField(blank=True)
    count = models.IntegerField(default=0)
    big = models.BigIntegerField(null=True)
    small = models.PositiveSmallIntegerField(null=True)
    ratio = models.FloatField(null=True)
    amount = models.DecimalField(max_digits=20, decimal_places=6, null=True)
    flag = models.BooleanField(default=False)
    maybe = models.BooleanField(null=True)
    day = models.DateField(null=True)
    at = models.DateTimeField(null=True)
    clock = models.TimeField(null=True)
    span = models.DurationField(null=True)
    token = models.UUIDField(default=uuid.uuid4)
    blob = models.BinaryField(null=True)
    data = models.JSONField(null=True)
    where = PointField(null=True)
    tag = models.ForeignKey(Tag, null=True, blank=True, on_delete=models.SET_NULL)

    def __str__(self) -> str:
        return self.title


@scalepub.register
class Tagged(models.Model):
    """A many-to-many relation, which Django's serializers render with a query."""

    title = models.CharField(max_length=200)
    tags = models.ManyToManyField(Tag, blank=True, related_name="tagged")

    def __str__(self) -> str:
        return self.title
