"""Everything ffmpeg, as plain functions over local files; nothing else from mvserver is imported here (limits come
in as values, temporaries are named by the caller, failures leave as :mod:`mvserver.media.errors`).

``run`` (the one ffmpeg runner), ``limits`` (what a run may use), ``args`` (durations and client-supplied inputs),
``probe`` (describing files), ``timeline`` (an edit's frame arithmetic), ``assemble`` (joining clips), ``song`` (a
saved song's copies) and ``errors`` (what callers map to their own errors).
"""
