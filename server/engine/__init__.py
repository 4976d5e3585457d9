"""The vLLM engine and everything that runs next to it or inside it:

engine.py          Engine: the only owner of vLLM's AsyncLLM (start, generate, abort, health)
platform.py        CPU or GPU, the fast dtype, vLLM's CPU knobs
capture.py         hidden-state capture, front-end half: opt-in keys, config, wire format,
                   the receiver of the workers' pushes
capture_worker.py  hidden-state capture, worker half: the vLLM worker extension vLLM imports
                   inside its worker processes (the tap, the step planner, the sender)
model_store.py     the embedded model: the packaged GGUF turned into a folder vLLM loads
"""
