package main

func serve(m *Model, o *options, smp SamplerConfig, ctx int) error { return nil }
