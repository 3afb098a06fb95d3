"""Building an engine folder: plan, export, manifest, atomically.

- ``pipeline``: ``build`` and ``export_folder``, the orchestration (stages, manifest);
- ``graphs``: the graph jobs a build exports, each with its expected IO (``plan_build``);
- ``destination``: the atomic build folder (hidden sibling, ``--force``, free space);
- ``config``: ``BuildConfig``, the recorded build options;
- ``tensorrt`` (engines), ``trt_parser`` (graphs as TensorRT parses them), ``trt_flavors``
  (datacenter TensorRT vs TensorRT-RTX) and ``trt_config`` (engine build settings).
"""
