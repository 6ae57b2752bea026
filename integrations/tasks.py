"""Celery tasks of the integrations app. Thin: the work is in the modules they name."""

from __future__ import annotations

import logging

from celery import shared_task

from integrations.dicom import export

logger = logging.getLogger(__name__)


@shared_task(name="integrations.dicom_exports_send")
def dicom_exports_send() -> dict:
    """Send the due VBQ SR / overlay exports to the PACS (``integrations.dicom.export``)."""

    return export.send_due_exports()


def enqueue_dicom_exports_send() -> None:
    """After commit: a broker outage is logged, not raised (the periodic run sends the row)."""
    try:
        dicom_exports_send.delay()
    except Exception as exc:
        logger.warning("integrations.dicom_exports_send not queued: %s", type(exc).__name__)
