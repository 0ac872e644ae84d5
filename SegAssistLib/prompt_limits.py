"""The limits on the size of a prompt, whatever a client sends: a slab's box, a stroke's vertices, the
work of rasterising a scribble, an initial mask's box. :mod:`SegAssistLib.prompts` refuses a prompt
beyond them when it is parsed; :mod:`SegAssistLib.stroke_voxels` refuses a stroke beyond them before
it draws it. Plain numbers: no torch.
"""

MAX_SLAB_AXIS = 4096  # voxels along any axis of a slab's box
MAX_SLAB_VOXELS = 4096 * 4096  # voxels in a slab's box: 2 MiB of bits at most, whatever the client sends
_MAX_SLAB_DATA_CHARS = 4 * ((MAX_SLAB_VOXELS // 8 + 4096) // 3 + 1)  # base64 of the worst zlib output
MAX_SLAB_OFFSET = 2**31  # |offset| of a slab's box on any axis: past any image, and no int64 overflow

# Strokes given as points: whatever a client sends, rasterising one takes bounded memory and time.
# Real strokes are far below these: a Slicer curve or a simulated scribble (one vertex per pixel of a
# skeleton or an outline) has at most a few thousand vertices on the largest images (2048 per axis).
MAX_STROKE_VERTICES = 16384  # vertices of a scribble's polyline or a lasso's polygon
# A scribble is rasterised as its samples every half voxel, each widened by the points of a disc of
# its width (1 point at width 1, about 1,100 at width 20), in chunks of
# stroke_voxels._SCRIBBLE_CHUNK_POINTS.
MAX_SCRIBBLE_SAMPLES = 2**19  # samples: a stroke about 260,000 voxels long (any width)
MAX_SCRIBBLE_POINTS = 2**23  # samples x disc points: at width 20, a stroke about 3,700 voxels long

# An initial mask's box: a whole image of the largest size a server takes (600 Mi voxels) fits.
MAX_MASK_VOXELS = 2**31  # voxels in a mask prompt's box
MAX_MASK_EXTENT = 2**31  # offset + shape on any axis: no int64 overflow anywhere
MAX_MADE_BY_CHARS = 200  # a mask prompt's model version (made_by): a name, not a payload
