"""The per-job engine command: WhisperX's own CLI, with `--vad_method silero` served offline.

Engine side (run by whisperx.sh with the engine venv's python; stdlib + WhisperX only). WhisperX's
CLI fetches Silero with torch.hub, which needs the network; this entry swaps in the Silero model
that faster-whisper's wheel carries (engine_vad.OfflineSilero) and then runs WhisperX's CLI
unchanged: the same arguments, the same steps (`whisperx.transcribe.transcribe_task`), the same
output files. `--vad_method pyannote` is WhisperX's own pyannote VAD, as before.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine_vad import install_offline_silero

    install_offline_silero()
    from whisperx.__main__ import cli

    sys.argv[0] = "whisperx"  # argparse's usage and error lines read as the CLI's own
    sys.exit(cli())
