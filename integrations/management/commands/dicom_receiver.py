"""Run the DICOM C-STORE receiver (a Celery-free process): ``manage.py dicom_receiver``."""

from __future__ import annotations

from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from integrations.dicom.scp import serve


class Command(BaseCommand):
    help = "Receive DICOM studies over C-STORE; complete studies are registered and scored."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=settings.DICOM_SCP_PORT)
        parser.add_argument("--ae-title", default=settings.DICOM_SCP_AE_TITLE)
        parser.add_argument("--bind", default=settings.DICOM_SCP_BIND,
                            help="address to listen on (0.0.0.0 in a container)")
        parser.add_argument("--complete-after", type=float,
                            default=float(settings.DICOM_STUDY_COMPLETE_SECONDS),
                            help="seconds without a new instance after which a study is complete")

    def handle(self, *args, **options) -> None:
        self.stdout.write(f"DICOM receiver {options['ae_title']} on port {options['port']}")
        serve(root=Path(settings.DICOM_STORAGE_ROOT), ae_title=options["ae_title"],
              port=options["port"], complete_after_s=options["complete_after"],
              bind=options["bind"])
