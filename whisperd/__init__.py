"""whisperd: a self-hosted HTTP transcription service in front of WhisperX."""

__version__ = "0.1.0"
