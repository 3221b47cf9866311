"""``python -m device_agent`` (and the zipapp) run the agent CLI."""
import sys

from .cli import main

sys.exit(main())
