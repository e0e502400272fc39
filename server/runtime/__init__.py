"""The adapter runtime: how adapters attach to the frozen base model (the device tier).

- `kinds.py`: one handler per adapter kind in one table (`KINDS`): to_device, install, apply, prefix.
- `layers.py`: the wrapped base modules (AdapterLinear, AdapterSublayer) and their shared batch.
- `slots.py`: device-slot and KV-prefix bookkeeping (no weights move there).
- `merge.py`: adaptive merge of a lone LoRA into the base weights.
- `runtime.py`: `DeviceRuntime` — reserve, activate, prepare, release, drop, reset.
"""
