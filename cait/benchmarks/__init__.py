"""The benchmarks behind every number in the README (run them from ``bench/`` or ``cait bench``):

- :mod:`.latency`: dense vs compressed models timed side by side (``cait bench``);
- :mod:`.kernels`: the Triton kernels against their peers on a GPU, and the ahead-of-time compile report;
- :mod:`.accuracy`: the digits classification benchmark (``cait bench --accuracy``);
- :mod:`.segmentation`: the digit-canvas segmentation benchmark (``cait bench --segmentation``);
- :mod:`.report`: all of it in one JSON/Markdown report with plots (``cait bench --all``).
"""
