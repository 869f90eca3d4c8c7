"""GET /models: what the web page offers in its lists (installed models and the defaults)."""

from __future__ import annotations

from ..config import OUTPUT_FORMATS
from ..languages import AUTO, WHISPER_LANGUAGES
from ..models import TASKS, catalog, installed_models
from .base import BaseHandler


class PageModelsHandler(BaseHandler):
    async def get(self) -> None:
        config = self.service.config
        self.send_json({
            "models": installed_models(config.WHISPER_MODELS_DIR),
            # The same models with what each can do: the page offers a model's own languages only.
            "model_info": catalog(config.WHISPER_MODELS_DIR, self.service.engine_status()["loaded_models"]),
            "tasks": list(TASKS),
            # Online, WhisperX can also download models by name; offline only these run.
            "can_download": not self.service.offline,
            "languages": [AUTO, *sorted(WHISPER_LANGUAGES)],
            "formats": list(OUTPUT_FORMATS),
            "defaults": {
                "model": config.WHISPER_DEFAULT_MODEL,
                "language": config.WHISPER_DEFAULT_LANGUAGE,
                "response_format": config.WHISPER_OUTPUT_FORMAT,
                "diarize": config.WHISPER_DEFAULT_DIARIZE,
                "task": "transcribe",
            },
            "webhooks": bool(config.WHISPER_WEBHOOK_SECRET),
            "max_file_size": config.MAX_FILE_SIZE,
        })
