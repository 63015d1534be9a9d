//go:build unix && !linux

package main

// mapPopulate: other systems page the weights in on demand.
const mapPopulate = 0
