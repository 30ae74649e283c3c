# Shadows SGLang on the sglang-router process's path only (see ../__init__.py).
raise ImportError("SGLang's Python package is kept out of the sglang-router process "
                  "(maspo_megatron/rollout/router_shim): its launcher imports it only for "
                  "the optional tracing of the mini_lb debug balancer")
