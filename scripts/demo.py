"""Send one worker-sdxl request through the real handler and write the image.

Usage: UIW_ARTIFACTS=<artifact dir> .venv/bin/python scripts/demo.py [out.png]
Prints the PNG's absolute path.
"""

import asyncio
import base64
import json
import sys
from pathlib import Path

from runtime.handler import handler

REQUEST = {"input": {"prompt": "a lighthouse on a cliff at dusk", "seed": 42, "num_images": 1}}


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out/demo.png").resolve()
    reply = asyncio.run(handler(REQUEST))
    if "error" in reply:
        print(json.dumps(reply), file=sys.stderr)
        return 1
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(reply["images"][0].split(",", 1)[1]))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
