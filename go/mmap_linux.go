package main

import "syscall"

// mapPopulate has Linux map the whole file in at load time (as llama.cpp
// does), so the first forward pass does not take a page fault every few
// pages of weights.
const mapPopulate = syscall.MAP_POPULATE
