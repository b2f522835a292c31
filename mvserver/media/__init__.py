"""Everything ffmpeg, as plain functions over local files.

``run`` (the one ffmpeg runner), ``limits`` (what a run may use), ``args`` (durations and client-supplied inputs),
``probe`` (describing files), ``timeline`` (an edit's frame arithmetic), ``assemble`` (joining clips), ``song`` (a
saved song's copies) and ``errors`` (what callers map to their own errors).
"""
