"""Rows that are hard to carry: every odd field type, a text pk, node rules that fail.

Published like any app's models; tests/test_hostile.py drives them through the real stack.
"""

import uuid

from django.db import models

import scalepub


@scalepub.register(node=lambda s: f"/kitchensink/Specimen/{s.channel}")
class Specimen(models.Model):
    """One column of each odd type; ``channel`` picks the node, so tests do not cross."""

    channel = models.CharField(max_length=64, default="main")
    title = models.CharField(max_length=200, blank=True)
    body = models.TextField(blank=True)
    blob = models.BinaryField(null=True)
    data = models.JSONField(null=True)
    day = models.DateField(null=True)
    at = models.DateTimeField(null=True)
    amount = models.DecimalField(max_digits=30, decimal_places=10, null=True)
    token = models.UUIDField(default=uuid.uuid4)
    span = models.DurationField(null=True)
    ratio = models.FloatField(null=True)
    flag = models.BooleanField(null=True)

    def __str__(self) -> str:
        return f"specimen {self.pk} on {self.channel}"


@scalepub.register(node=lambda k: f"/kitchensink/Keyed/{k.channel}")
class Keyed(models.Model):
    """A text primary key: it travels in XML attributes (the entry's and Django's)."""

    code = models.CharField(max_length=200, primary_key=True)
    channel = models.CharField(max_length=64, default="main")
    text = models.TextField(blank=True)

    def __str__(self) -> str:
        return self.code


def route_node(row: "Routed") -> str:
    """The node rule under test: raises on request, otherwise trusts the row."""
    if row.route == "raise":
        raise RuntimeError("node rule failed on purpose")
    return row.route


@scalepub.register(node=route_node)
class Routed(models.Model):
    """A row whose node name comes from its data: may raise or name an invalid node."""

    route = models.CharField(max_length=400)
    note = models.CharField(max_length=100, blank=True)

    def __str__(self) -> str:
        return f"{self.note} -> {self.route}"


@scalepub.register(node="/kitchensink/Animal")
class Animal(models.Model):
    """Inheritance: a row is published to the node of its own class only, as Django's
    ``post_save`` names it (``sender``): a child's create is not its parent's."""

    name = models.CharField(max_length=64)


@scalepub.register(node="/kitchensink/Dog")
class Dog(Animal):
    """Multi-table inheritance, registered as well: one entry, the Dog's."""

    breed = models.CharField(max_length=64, blank=True)


class Cat(Animal):
    """Inherits a registered model, not registered itself: no entry."""

    indoor = models.BooleanField(default=True)


@scalepub.register(node="/kitchensink/LoudAnimal")
class LoudAnimal(Animal):
    """A proxy of a registered model, registered on its own node."""

    class Meta:
        proxy = True
