"""Put a `fides protect` kit beside a local copy of the service it protects: a repository in
which the service is served from its own ONNX file with the kit's integrity block, as the
provider who runs the model would serve it (the kit itself serves an upstream URL). What
`fides bench integrity --part cost` needs to measure verification on that model.

    python scripts/local_kit.py runs/protect_fashion_mnist_1x/repository \
        bench/services/fashion_mnist runs/fashion_local

The kit's integrity models keep their configs (``execution`` as the kit chose it), except
those named with ``--inline`` (kits from before ``execution`` existed have none).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import yaml

from fides.bench.verified import integrity_models


def main(kit: Path, service: Path, out: Path, inline: list[str]) -> None:
    name = service.name
    kit_config = yaml.safe_load((kit / name / "config.yaml").read_text(encoding="utf-8"))
    block = kit_config.get("integrity")
    if not block:
        raise SystemExit(f"{kit / name / 'config.yaml'} has no integrity block")
    if out.exists():
        raise SystemExit(f"{out} exists; remove it first")
    out.mkdir(parents=True)
    shutil.copytree(service, out / name)
    config = yaml.safe_load((out / name / "config.yaml").read_text(encoding="utf-8"))
    config["integrity"] = block
    (out / name / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    needed = integrity_models(kit_config)
    for entry in needed:
        shutil.copytree(kit / entry, out / entry)
    for entry in inline:
        path = out / entry / "config.yaml"
        if not path.is_file():
            raise SystemExit(f"--inline {entry}: not one of the kit's integrity models")
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg["execution"] = "inline"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"{out}: {name} (local) with {', '.join(needed)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kit", type=Path, help="the repository fides protect wrote")
    parser.add_argument("service", type=Path, help="the service's model folder")
    parser.add_argument("out", type=Path, help="the repository to write")
    parser.add_argument("--inline", action="append", default=[], help="serve this one inline")
    args = parser.parse_args()
    main(args.kit, args.service, args.out, args.inline)
