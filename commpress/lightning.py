"""PyTorch Lightning front end: a DDP strategy that registers the compression hook on every
device.

Lightning's own ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)`` registers a comm hook
only when the model is on CUDA; on CPU (gloo) it silently trains uncompressed. This strategy
registers :func:`commpress.compress_hook` through :func:`commpress.register_hook` wherever the
model is, and warns at the end of ``fit`` if the hook never ran.

Built on ``lightning.pytorch`` when that package is installed, else on ``pytorch_lightning``
(``pip install commpress[lightning]``); pass it to a ``Trainer`` of the same package.
"""
from __future__ import annotations

import warnings
from typing import Union

try:
    from lightning.pytorch.strategies import DDPStrategy
except ImportError:  # the standalone package
    try:
        from pytorch_lightning.strategies import DDPStrategy
    except ImportError as exc:
        raise ImportError("commpress.lightning needs PyTorch Lightning: "
                          "pip install 'commpress[lightning]'") from exc

from .ddp import CompressionState, register_hook, state_from_name


class CompressedDDPStrategy(DDPStrategy):
    """``DDPStrategy`` whose gradient all-reduce goes through commpress.

    Args:
        state: a :class:`~commpress.CompressionState`, or a hook name for
            :func:`~commpress.state_from_name` (``"qsgd4"``, ``"natural+ef"``, ...), in which
            case every process builds its own state from ``state_kwargs`` and closes it in
            ``teardown``. A state passed in stays open, so its statistics and ``state_dict``
            can be read after ``fit`` (it serves one ``fit``'s model).
        state_kwargs: keyword arguments of :class:`~commpress.CompressionState` (names only).
        **kwargs: ``DDPStrategy``'s own (``find_unused_parameters``, ``static_graph``,
            ``timeout``, ...). ``ddp_comm_hook``/``ddp_comm_state`` are refused: the point of
            this class is to own them.

    Example::

        >>> strategy = CompressedDDPStrategy("qsgd4+ef")
        >>> trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy)
        >>> trainer.fit(model)
        >>> print(strategy.compression_state.stats.summary())
    """

    def __init__(self, state: Union[CompressionState, str] = "qsgd4", state_kwargs=None,
                 **kwargs):
        for taken in ("ddp_comm_hook", "ddp_comm_state", "ddp_comm_wrapper"):
            if kwargs.get(taken) is not None:
                raise ValueError(f"CompressedDDPStrategy registers commpress's hook itself; "
                                 f"drop {taken}=")
        if not isinstance(state, (CompressionState, str)):
            raise TypeError(f"state must be a CompressionState or a hook name, got "
                            f"{type(state).__name__}")
        if state_kwargs and not isinstance(state, str):
            raise TypeError("state_kwargs are only accepted with a hook name")
        if isinstance(state, str):
            state_from_name(state, **(state_kwargs or {}))  # reject a bad name or option now
        super().__init__(**kwargs)
        self._state_spec, self._state_kwargs = state, dict(state_kwargs or {})
        self._owns_state = isinstance(state, str)
        self.compression_state: CompressionState | None = None if self._owns_state else state

    def configure_ddp(self) -> None:
        super().configure_ddp()  # wraps the model in DDP; registers no hook (none given)
        if self._owns_state:  # a fresh state per fit: the last one was closed in teardown
            self.compression_state = state_from_name(self._state_spec, **self._state_kwargs)
        register_hook(self.model, self.compression_state)

    def teardown(self) -> None:
        state = self.compression_state
        module = self.lightning_module
        trainer = getattr(module, "_trainer", None) if module is not None else None
        if state is not None and trainer is not None and trainer.global_step > 0 and state.iter == 0:
            warnings.warn("commpress: the compression hook never ran during fit "
                          f"({trainer.global_step} optimizer steps); gradients were not reduced "
                          "through commpress", RuntimeWarning, stacklevel=2)
        if self._owns_state and state is not None:
            state.close()  # its statistics stay readable
        super().teardown()
