"""``python -m ccm_sdk.training <trainer> --config FILE [overrides]`` (what torchrun launches)."""

from .cli import main

raise SystemExit(main())
