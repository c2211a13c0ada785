"""ExecuTorch's Python runtime over a ``.pte``. The KV cache lives in the program's mutable
buffers, shared by its prefill and decode methods (one program method, ``step``, runs both where
the manifest says so); reset runs the program's reset_cache method."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import zip_longest
from pathlib import Path

import torch

from omni_export.runtime_py.backends import et_options
from omni_export.runtime_py.backends.base import SESSIONS, Session, host_cores

RESET = "reset_cache"


def program_files(entry, root: Path) -> tuple[Path, Path | None]:  # type: ignore[no-untyped-def]
    """A component's program and the ``.ptd`` holding its weights, where it keeps them outside."""
    data = [f for f in entry.files[1:] if f.endswith(".ptd")]
    return Path(root) / entry.files[0], (Path(root) / data[0] if data else None)


class ExecuTorchSession(Session):
    backend = "executorch"
    stateful = True

    def __init__(self, path: Path, threads: int = 0, data: Path | None = None, options: Mapping[str, str] | None = None,
                 entries: Mapping[str, str] | None = None) -> None:
        from executorch.runtime import Runtime

        # LLM artifacts call llama::update_cache / llama::custom_sdpa; their kernels register on import.
        from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401

        if threads:
            from executorch.extension.pybindings.portable_lib import (
                _threadpool_get_thread_count,
                _unsafe_reset_threadpool,
            )

            if _threadpool_get_thread_count() != threads:
                _unsafe_reset_threadpool(threads)
        if options:  # process-wide, as on a device; set before this program's methods load
            et_options.apply(options)
        self.path = Path(path)
        self.data = None if data is None else Path(data)
        self._runtime = Runtime.get()
        self.reset()
        # method -> the program method that runs it (the manifest's entries; else each its own)
        self._entries = dict(entries) if entries else {n: n for n in self._program.method_names}

    @classmethod
    def unavailable(cls) -> str | None:
        try:
            import executorch.runtime  # noqa: F401
        except ImportError as exc:  # the runtime is an optional install on a device
            return f"the ExecuTorch runtime is not installed ({exc}); pip install executorch"
        return None

    @classmethod
    def open(cls, entry, root: Path, settings) -> ExecuTorchSession:  # type: ignore[no-untyped-def]
        # The profile's thread count, never more than this host's cores (a phone profile run on a
        # small host would only oversubscribe it).
        pte, data = program_files(entry, root)
        return cls(pte, min(settings.threads, host_cores()) if settings.threads else 0, data, settings.options,
                   {method: m.entry for method, m in entry.methods.items()})

    @classmethod
    def interface_problems(cls, entry, root: Path) -> list[str]:  # type: ignore[no-untyped-def]
        """The program has every method the manifest lists, each with its number of inputs and
        outputs, and the cache reset where the cache lives in the program."""
        from executorch.runtime import Runtime

        rel = entry.files[0]
        try:
            pte, data = program_files(entry, root)
            program = Runtime.get().load_program(pte, data_path=data)
        except Exception as exc:  # the runtime raises RuntimeError (and others) for a damaged program
            return [f"{rel}: not an ExecuTorch program ({type(exc).__name__}: {str(exc)[:120]})"]
        names = set(program.method_names)
        problems = []
        for method, m in entry.methods.items():
            if m.entry not in names:
                problems.append(f"{rel}: has no method {m.entry!r} (the manifest's {method}); it has {sorted(names)}")
                continue
            meta = program.metadata(m.entry)
            if (meta.num_inputs(), meta.num_outputs()) != (len(m.inputs), len(m.outputs)):
                problems.append(f"{rel}: {m.entry} takes {meta.num_inputs()} inputs and gives {meta.num_outputs()} outputs, "
                                f"the manifest says {len(m.inputs)} and {len(m.outputs)}")  # fmt: skip
        if entry.kv_cache is not None and entry.kv_cache.held_as == "buffers" and RESET not in names:
            problems.append(f"{rel}: holds a KV cache but has no {RESET} method")
        return problems

    def reset(self) -> None:
        if not hasattr(self, "_program"):
            self._program = self._runtime.load_program(self.path, data_path=self.data)
            # Load every method before running any: the methods share the KV cache's memory, and
            # it must not be set up again after a prefill has filled it.
            self._loaded = {name: self._program.load_method(name) for name in sorted(self._program.method_names)}
        if RESET in self._loaded:  # planned memory starts undefined: zero the cache before use
            self._loaded[RESET].execute([])

    @property
    def methods(self) -> set[str]:
        return set(self._entries)

    def planned_bytes(self) -> int | None:
        """What the runtime allocates for the program's memory plans: ExecuTorch gives the
        host-only methods of a program one set of arenas, each sized to the largest method's
        (activations, and the KV cache where the program holds it)."""
        plans = self._plans()
        return None if plans is None else sum(map(max, zip_longest(*plans.values(), fillvalue=0)))

    def planned_bytes_by_method(self) -> dict[str, int] | None:
        """Each method's own memory plan in bytes (the arenas it would need alone)."""
        plans = self._plans()
        return None if plans is None else {name: sum(s[1:]) for name, s in plans.items()}

    def _plans(self) -> dict[str, list[int]] | None:
        """Each method's arena sizes; buffer 0 of each plan is reserved (size 0). None where the
        program's header cannot be read."""
        try:  # the runtime's bindings do not expose the plan; the program's own header does
            from executorch.exir._serialize._program import _flatbuffer_to_program, _get_extended_header
        except ImportError:  # a device install without the exporter
            return None
        with open(self.path, "rb") as f:
            head = f.read(64)
            eh = _get_extended_header(head)
            size = eh.program_size if eh is not None and eh.is_valid() else self.path.stat().st_size
            f.seek(0)
            program = _flatbuffer_to_program(f.read(size))
        return {plan.name: list(plan.non_const_buffer_sizes) for plan in program.execution_plan}

    def run(self, method: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return list(self._loaded[self._entries.get(method, method)].execute([x.contiguous() for x in inputs]))


SESSIONS.register(ExecuTorchSession.backend, ExecuTorchSession)
