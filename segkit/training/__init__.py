"""The training stage behind ``train_unet.py``, one module per part (README.md, "Stage 2" and "Development").

``config`` (RunConfig) and ``resolve`` (arguments -> RunConfig) never import TensorFlow; the other
modules import it inside their functions, so importing this package stays cheap.
"""
