"""``peft-lyco convert``: kohya file ⇄ PEFT adapter folder, renaming between namings, changing precision."""

from __future__ import annotations

from pathlib import Path

import torch

from ..convert import save_kohya
from ..convert.builtin import check_deltas
from ..convert.names import NameResolver, model_names
from .adapters import DTYPES, kohya_contents, module_delta, read_adapter, write_peft_folders

# relative ΔW error a written module may show against the adapter's own, by stored precision
TOLERANCE = {None: 1e-5, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def run(args) -> int:
    adapter = read_adapter(args.input, args.model_type)
    to = args.to or ("kohya" if str(args.output).endswith(".safetensors") else "peft")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if to == "peft":
        folders = write_peft_folders(args.output, adapter, dtype)
        print(f"wrote {len(adapter.modules)} modules as PEFT adapter folder(s): " + ", ".join(map(str, folders)))
        return 0
    state_dict, metadata = kohya_contents(adapter, naming=args.naming, dtype=dtype)
    if adapter.source.startswith("peft:"):
        # every module as kohya readers will compute it, against the adapter's own ΔW, before anything is written
        resolver = NameResolver(model_names(adapter.model_type))
        expected = {
            resolver.kohya_name(m.component, m.path, args.naming): module_delta(m, torch.float64)
            for m in adapter.modules
        }
        errors = check_deltas(state_dict, expected, rtol=TOLERANCE[dtype], where=str(args.input))
        print(f"checked {len(errors)} modules as readers load them: max relative ΔW error {max(errors.values()):.2e}")
    path = save_kohya(args.output, state_dict, metadata)
    print(f"wrote {len(adapter.modules)} modules to {Path(path)}")
    return 0
