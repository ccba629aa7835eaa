"""attrib_torch: AttributionTask and the attributor classes users hold.

Thin wrappers over :mod:`attrib_core` with the class names and signatures of
the older libraries (see ``DESIGN.md``). The classes land with their issues;
until then, the functional core in :mod:`attrib_core` is the public API.
"""
