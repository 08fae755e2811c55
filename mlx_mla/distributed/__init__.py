"""Models larger than one machine: pipeline stages over mx.distributed, and the cost model that
splits the layers."""
