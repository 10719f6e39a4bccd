from models.torchvision_compat import ensure_torchvision

ensure_torchvision()  # before transformers looks for it (models/torchvision_compat.py)
