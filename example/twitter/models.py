"""The example model, registered with scalepub: one pubsub node per author."""

from django.db import models

import scalepub


@scalepub.register(node=lambda tweet: f"/twitter/Tweet/{tweet.author}")
class Tweet(models.Model):
    """A short message by an author; followers subscribe to ``/twitter/Tweet/<author>``."""

    author = models.CharField(max_length=64, db_index=True)
    text = models.CharField(max_length=280)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"@{self.author}: {self.text}"
