"""SegAssistLib: the Slicer-independent library behind SegAssist.

The torch-free parts (prompts, geometry, io, client) run in any Python with numpy; the engine,
training and server need torch and MONAI.
"""

__version__ = "0.1.0"
