module nanollama

go 1.19
