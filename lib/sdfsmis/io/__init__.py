"""Reading and writing what the product is given and keeps: NIfTI volumes with their geometry,
backbones (local folder or hub id, offline), and our weights (safetensors)."""
