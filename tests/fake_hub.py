"""A stand-in for huggingface_hub's snapshot_download: a local checkpoint folder served as a hub
repo into a cache folder, honouring allow_patterns and recording what each call fetched."""

import shutil
from fnmatch import fnmatch
from pathlib import Path


class FakeHub:
    def __init__(self, repo, cache):
        self.repo, self.cache = Path(repo), Path(cache)
        self.calls: list[list[str]] = []  # the file names each call copied into the cache

    def snapshot_download(self, repo_id: str, allow_patterns=None, **kwargs) -> str:
        snapshot = self.cache / repo_id.replace("/", "--")
        snapshot.mkdir(parents=True, exist_ok=True)
        fetched = []
        for file in sorted(self.repo.iterdir()):
            allowed = allow_patterns is None or any(fnmatch(file.name, p) for p in allow_patterns)
            if allowed and not (snapshot / file.name).exists():
                shutil.copy(file, snapshot / file.name)
                fetched.append(file.name)
        self.calls.append(fetched)
        return str(snapshot)

    def weights_fetched(self) -> set[str]:
        return {name for call in self.calls for name in call if name.endswith(".safetensors")}
