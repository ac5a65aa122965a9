"""The I/O layer: the safetensors format, the HF key table and checkpoint validation, Orbax parameter storage,
model directories, training checkpoints, LoRA adapters on a stored base (`adapters`), atomic outputs, HF <-> Orbax
conversion and the one loader (`load.load`). Depends on the model layer for shapes; the model never imports it."""
