"""dpvit: a Vision Transformer in plain numpy, trained data-parallel over MPI.

The public API, for using a trained model or building one from Python::

    from dpvit import load_model
    model, config, checkpoint = load_model("runs/x/checkpoints/best.h5")
    probabilities = model.predict_proba(images)  # (N, 1, 28, 28) normalised float32

    from dpvit import ViTConfig, VisionTransformer
    model = VisionTransformer(ViTConfig(depth=2), seed=0)

Training runs from the command line: ``mpirun -n 4 python -m dpvit.train``.
"""

__version__ = "0.1.0"

from dpvit.checkpoint import Checkpoint, load_checkpoint
from dpvit.config import Config, TrainConfig, load_config
from dpvit.inference import load_model
from dpvit.vit import VisionTransformer, ViTConfig

__all__ = ["Checkpoint", "Config", "TrainConfig", "ViTConfig", "VisionTransformer",
           "__version__", "load_checkpoint", "load_config", "load_model"]
