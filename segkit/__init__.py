"""segkit: the shared core of the segmentation toolkit (see README.md, "Development").

The stage scripts (build_lmdb.py, train_unet.py, inference_unet.py) are thin command lines over
these modules. Importing the package imports no TensorFlow.
"""
