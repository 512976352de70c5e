"""Does the object-dependent up-sampling do what the paper says? Permeation rates and skip features.

The paper's diagnostic (Eq. 7, Fig. 2) is the permeation rate: per skip stage, how much of
an object's feature survives the ODU residual subtraction r_s = x_s - u_s. It should be
high for small objects at early stages (u_s ~ 0, "annihilation": the object passes) and
low for large ones (u_s ~ the low-frequency part of x_s: only edges pass). Fig. 3 shows
the skip features themselves. This package computes both for a trained network:
  permeation.py  the rate: pure functions, and through a model (`permeation_rate`)
  objects.py     objects of a slice, rates of every object of a volume, their summary
  plots.py       the Fig. 2 and Fig. 3 pictures
  report.py      `diagnose`: all of it for a training run's split (`munet-diagnose`)

Definition (our reading of the paper's Eq. 7, whose typesetting the published PDF lost):
  Stage s = 1 .. S-1 is a skip connection (modules skip_1 .. skip_{S-1}); it works at
  1 / 2**(s-1) of the (padded) input's resolution. For one image, x_s is the encoder
  feature entering the skip ("before_residual") and r_s = x_s - u_s the feature leaving
  the ODU residual path ("after_residual", right before the skip's extra convolution);
  in a network without the residual path (model.odu_residual=False) r_s is x_s.
  1. Normalisation: every feature map -- one channel of one image -- is min-max
     normalised to [0, 1] over its whole extent, x_s and r_s each on their own. A
     constant map carries nothing and normalises to 0.
  2. The object mask (input resolution) is brought to stage s by area: a stage pixel is
     in the object when at least half of the 2**(s-1) x 2**(s-1) input pixels it covers
     are ("area", the default). An object smaller than half a stage pixel therefore
     vanishes at that stage, as small objects do in the paper's Fig. 2. `pooling="max"`
     counts any overlap instead (max-pooling the mask): every object keeps a pixel at
     every stage, measured on pixels that are mostly background.
  3. Masked mean: the mean of the normalised feature over its channels and the object's
     stage pixels (the mean over channels of per-channel masked means; every channel
     has the same pixels, so the two orders agree).
  4. rate_s = masked mean of normalised r_s / masked mean of normalised x_s. It is
     the sentinel -0.5 (the paper's "no meaningful features") when the masked mean of
     x_s is <= 0.01, and when the object has no pixel at stage s.
  For a network without the residual path the rate is therefore exactly 1 wherever it
  is defined. The rate is not bounded by 1, and values above 1 are common in trained
  networks: r_s is a signed residual, so min-max normalisation puts its zero (full
  cancellation) near mid-range, while x_s inside an organ often sits near the bottom of
  its own range. Compare objects (small against large) rather than reading the value
  against 1 (bench/RESULTS.md, the ablation).

Slices whose sides are not a multiple of 2**(S-1) are edge-padded, as the model does
itself; the mask is padded with background, and normalisation covers the padded map.

Objects (command line): per axial slice, every 2-D tumour component (face connectivity)
and the liver (labels 1 and 2); small when its area in that slice, with the volume's
spacing, is below `eval.small_lesion_mm` squared (28 x 28 mm², the paper's bound; its
"65 pixels at stage 4" depends on the pixel size, so the physical area is used).
"""

from munet_jax.diagnostics.objects import slice_objects, summarize_rates, volume_object_rates
from munet_jax.diagnostics.permeation import (MIN_BEFORE, POOLINGS, SENTINEL, channel_mean_map,
                                              downsample_mask, masked_sums, normalise_maps,
                                              object_rates, permeation_rate, rate_from_sums,
                                              skip_features)
from munet_jax.diagnostics.plots import plot_permeation, plot_skip_features
from munet_jax.diagnostics.report import diagnose

__all__ = ["MIN_BEFORE", "POOLINGS", "SENTINEL", "channel_mean_map", "diagnose",
           "downsample_mask", "masked_sums", "normalise_maps", "object_rates",
           "permeation_rate", "plot_permeation", "plot_skip_features", "rate_from_sums",
           "skip_features", "slice_objects", "summarize_rates", "volume_object_rates"]
