"""URLs of the example project (the demo page arrives with the browser client)."""

urlpatterns: list = []
