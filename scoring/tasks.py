"""Celery tasks of the scoring app. Thin: they take ids."""

import logging

from celery import shared_task

logger = logging.getLogger(__name__)


@shared_task(name="scoring.study_received")
def study_received(study_id: int) -> None:
    """A study arrived or changed: link it to an index procedure and queue VBQ jobs.

    Placeholder until the imaging pipeline lands: it records that the job ran.
    """
    logger.info("study_received study=%s (pipeline not yet implemented)", study_id)
