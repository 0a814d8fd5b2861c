  return;
}
