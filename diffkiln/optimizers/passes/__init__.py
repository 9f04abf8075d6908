"""Graph passes, one file each. Every pass takes an `onnx_ir.Model`, rewrites it in place and returns how many
places it changed, so a silent non-match shows up as a 0 in the report (and fails the pinned-count tests)."""
