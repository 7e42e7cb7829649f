"""The reduction engine shared by the front ends: what reduces a gradient group (policy),
and what it communicates with (runtime)."""
