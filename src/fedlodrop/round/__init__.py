"""The two halves of a round: the device step (`client`) and the server's configure and finish
(`server`), what a round leaves behind (`records`), and the pieces that plug into it: client-level
differential privacy (`privacy`) and secure aggregation's maths (`secagg`)."""
