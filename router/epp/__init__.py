"""tusk as a Gateway API Inference Extension endpoint picker (Envoy ext_proc); see docs/gateway.md."""
