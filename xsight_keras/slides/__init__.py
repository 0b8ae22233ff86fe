"""Whole-slide images: reading at the model's scale, tissue detection, streaming prediction of
every nucleus, and the outputs pathologists open (QuPath GeoJSON, a Parquet table, overlays).

Needs the ``slides`` extra (OpenSlide, pyarrow, shapely): ``pip install 'xsight-keras[slides]'``;
importing this package works without it, reading a slide does not.
"""

from xsight_keras.slides.pipeline import SlideSettings, predict_cohort, predict_slide, shard
from xsight_keras.slides.reader import SlideError, SlideReader, collect_slides
from xsight_keras.slides.tissue import tissue_mask

__all__ = ["SlideError", "SlideReader", "SlideSettings", "collect_slides", "predict_cohort",
           "predict_slide", "shard", "tissue_mask"]
