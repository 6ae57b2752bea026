"""Report URLs (filled in by the QI reports work)."""

urlpatterns: list = []
