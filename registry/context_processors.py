from django.conf import settings
from django.http import HttpRequest


def clinic(request: HttpRequest) -> dict:
    """Template context every page needs: role flags for navigation, demo banner."""
    user = getattr(request, "user", None)
    perms = user.get_all_permissions() if user is not None and user.is_authenticated else set()
    return {
        "DEMO_MODE": settings.DEMO_MODE,
        "can_view_phi": "registry.view_identified_data" in perms,
        "can_view_reports": "registry.view_reports" in perms,
        "can_work_alerts": "registry.work_alerts" in perms,
        "can_review_vbq": "registry.review_vbq" in perms,
    }
