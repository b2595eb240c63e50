"""``peft-lyco convert``: kohya file ⇄ PEFT adapter folder, renaming between namings, changing precision."""

from __future__ import annotations

from pathlib import Path

from ..convert.builtin import check_reloaded
from .adapters import DTYPES, module_delta, read_adapter, write_kohya, write_peft_folders


def run(args) -> int:
    adapter = read_adapter(args.input, args.model_type)
    to = args.to or ("kohya" if str(args.output).endswith(".safetensors") else "peft")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if to == "peft":
        folders = write_peft_folders(args.output, adapter, dtype)
        print(f"wrote {len(adapter.modules)} modules as PEFT adapter folder(s): " + ", ".join(map(str, folders)))
        return 0
    path = write_kohya(args.output, adapter, naming=args.naming, dtype=dtype)
    if adapter.source.startswith("peft:") and dtype is None:
        # every module of the written file against the adapter's own ΔW (PEFT's scale rule)
        from ..convert.names import NameResolver, model_names

        resolver = NameResolver(model_names(adapter.model_type))
        expected = {
            resolver.kohya_name(m.component, m.path, args.naming): module_delta(m, dtype=__import__("torch").float64)
            for m in adapter.modules
        }
        errors = check_reloaded(path, expected, rtol=1e-5)
        print(f"checked {len(errors)} reloaded modules: max relative ΔW error {max(errors.values()):.2e}")
    print(f"wrote {len(adapter.modules)} modules to {Path(path)}")
    return 0
