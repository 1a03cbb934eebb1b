"""Django integration: add ``"scalepub.django"`` to INSTALLED_APPS, then ``scalepub.register``."""
