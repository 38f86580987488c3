"""Interop with the PyTorch ecosystem: timm's VisionTransformer layout and safetensors files.

``timm_layout`` maps dpvit's parameters to and from the state dict of
``timm.models.vision_transformer.VisionTransformer`` and says which timm constructor arguments
rebuild the same function; ``weights`` writes and reads such ``.safetensors`` files (the
optional extra ``export``: ``pip install -e ".[export]"``). ``python -m dpvit.export`` writes
one from a checkpoint, ``python -m dpvit.train --init-from FILE`` starts from one.
"""
