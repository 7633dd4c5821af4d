"""Maskers: which patches of an image a pre-training method hides.

Each is a plain function of explicit randomness, written from a method's reference
code and tested against a transcription of it:

  * `blockwise.BlockwiseMasker`: BEiT / MaskFeat rectangles of patches, made in the
    data workers from the example's `numpy.random.Generator` (a `WorkerField`);
  * `mask_patches`: SimMIM's random coarse "mask patches" (32 px) repeated to the
    model's patch grid, on the device from noise or in the workers.
"""
