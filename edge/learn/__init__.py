"""Learning on the device, numpy only: shallow updates from labelled samples
(:mod:`edge.learn.update`), growth of new adaptors (:mod:`edge.learn.growth`) and the
hand-written-backprop trainer they use (:mod:`edge.learn.device_trainer`)."""
