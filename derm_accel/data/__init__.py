"""Data: conversion of class folders to Arrow, transforms and loaders."""
