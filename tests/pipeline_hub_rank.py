"""pipeline_rank.py with the Hugging Face hub faked: REPO is served into a cache folder of the
rank's own, and OUT/rank<r>.json also lists the files each download fetched.

python pipeline_hub_rank.py REPO CACHE HUB_ID ATTENTION OUT PROMPT_IDS MAX_TOKENS
"""

import json
import sys
from pathlib import Path

import huggingface_hub
import mlx.core as mx
import pipeline_rank
from fake_hub import FakeHub


def main(repo, cache, hub_id, attention, out, *rest):
    rank = mx.distributed.init().rank()
    hub = FakeHub(repo, Path(cache, f"rank{rank}"))
    huggingface_hub.snapshot_download = hub.snapshot_download
    pipeline_rank.main(hub_id, attention, out, *rest)
    result = Path(out, f"rank{rank}.json")
    result.write_text(json.dumps({**json.loads(result.read_text()), "downloads": hub.calls}))


if __name__ == "__main__":
    main(*sys.argv[1:])
